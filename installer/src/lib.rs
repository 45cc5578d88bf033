//! keel-installer (see issue: the installer ISO).
