"""Modality tokenizers. Each maps a batch of its modality to ``tokens [B, N, D], coords [B, N, C]``.

Which tokenizer a recipe builds is the modality table's word (``multijepa.modalities``: each spec's
``tokenizer``); the modules here are the ``nn.Module`` s themselves and take plain arguments.
"""
