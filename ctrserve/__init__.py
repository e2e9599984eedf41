"""ctrserve: CTR scoring for DLRM models with compressed embedding tables."""
