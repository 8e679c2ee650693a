pub mod canary;
pub mod floor;
pub mod gnutls;
pub mod gotls;
pub mod openssl;
pub mod plain;
pub mod process;
