pub mod openssl;
pub mod process;
