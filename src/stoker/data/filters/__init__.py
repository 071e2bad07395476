"""Document filters and redaction for data preparation: each a function over one document's
text that returns why it fails (a short reason such as "quality:mean_word_length") or None."""
