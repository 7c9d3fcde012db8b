//! placeholder: the wire protocol (being written)
