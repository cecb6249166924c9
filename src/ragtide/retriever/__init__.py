"""The retrieval service: the search API (and later answers, cache, dashboard). Never imports the Faust app."""
