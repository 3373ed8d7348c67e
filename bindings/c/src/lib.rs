//! The C ABI of oxccl (see include/oxccl.h).
