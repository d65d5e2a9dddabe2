"""Integrations with training frameworks, one module each, imported only on demand.

``triton_softmax.integrations.transformers`` puts the fused linear cross-entropy into a
Hugging Face causal language model (needs the ``[hf]`` extra). Importing this package imports
none of them, so ``import triton_softmax`` never imports transformers.
"""
