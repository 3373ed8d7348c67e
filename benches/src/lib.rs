//! Shared code of the oxccl benchmark binaries.
