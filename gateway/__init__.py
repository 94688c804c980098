"""The public API: tokenize, validate, stream, detokenize."""
