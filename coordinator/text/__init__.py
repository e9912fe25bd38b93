"""Text in and out of token ids, the coordinator's own way (no torch): tokenizers from a model
directory or a GGUF file (``tokenization``, ``gguf_tokenizer``), chat templates
(``chat_template``), incremental decoding (``detokenizer``) and stop strings (``stop``)."""
