//! keel-image (see issue: the installer ISO).
