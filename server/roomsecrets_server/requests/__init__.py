"""Request -> provide | reject flows and the WatchRequests event stream."""
