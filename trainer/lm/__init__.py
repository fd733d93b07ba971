"""Language modelling: text corpora, tokenizers, packed windows, the next-token loss."""
