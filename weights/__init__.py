"""Data package: the model registry (`registry.json`) and the shipped small model's directory.

Installed as `vqa2cli_weights`; read it with `importlib.resources.files("vqa2cli_weights")`.
"""
