"""`make bench`: drives orders through the running stack over HTTP and measures it (SPEC 8)."""
