pub mod canary;
pub mod openssl;
pub mod process;
