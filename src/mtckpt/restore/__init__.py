"""Restoring a step: verified reading of a rank's shard (``read``), assembling regions from
the shards of another world size or split (``reshard``), and choosing the newest step every
rank can restore, falling back across tiers and steps (``plan``)."""
