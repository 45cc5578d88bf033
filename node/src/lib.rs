//! keel-node
