"""Data: sources named by spec strings, the embedded synthetic scenes, safe image loading, batching."""
