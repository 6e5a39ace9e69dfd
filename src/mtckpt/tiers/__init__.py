"""Storage behind each tier: moving files and byte ranges, knowing nothing of manifests."""
