"""The hand-written Hugging Face glue of an exported folder (copied by pretrain/hf/bundle.py).

These files import the generated modules of the folder (``.pretrain_model_lm``, ...) and
work only there; the project never imports them.
"""
