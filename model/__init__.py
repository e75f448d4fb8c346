"""Hearth model: config, decoder, tokenizer and chat template, checkpoint I/O, quantized layers."""
