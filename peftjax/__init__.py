"""peftjax."""
