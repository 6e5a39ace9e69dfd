"""The on-disk contract (docs/format.md): file and directory names, the rank manifest, the
layout of shards in a data file, stored encodings and the commit marker. Every tier holds
checkpoints in this one format; nothing here knows about tiers' policies or frameworks."""
