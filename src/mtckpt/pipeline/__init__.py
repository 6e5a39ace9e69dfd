"""Saving: staging a state into a node-memory slot (``staging``), the save stages behind it
(``stages``: memory commit, then the slower tiers and the peers), the object tier's
uploader in a helper process or on threads (``uploader``), and what ``save`` returns
(``handle``)."""
