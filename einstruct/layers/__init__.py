"""torch modules emitted from compiled structures."""
