"""gpt2gen: a code-generating compiler for transformer training.

A YAML model file (``model.yaml``) is loaded and checked (``spec``), lowered against the op library
(``ops``, ``lower``) into a target-neutral program (``program``) over flat arenas (``layout``), rendered
by a target (``targets``: its kernel table and its Jinja templates) into C, compiled and cached
(``builder``) and driven from Python (``runtime``).
"""
__version__ = "0.1.0"
__all__ = ["build", "from_hf", "from_llmc", "__version__"]


from .runtime import build  # noqa: E402  (gpt2gen.build(model, target, **overrides) -> Model)


def from_llmc(path, target="cpu", **kwargs):
    """Load an llm.c model file (``gpt2_124M.bin``) into a new Model."""
    from .checkpoint import from_llmc as _from_llmc
    return _from_llmc(path, target=target, **kwargs)


def from_hf(directory, model="model.yaml", target="cpu", **overrides):
    """Import a local HuggingFace checkpoint (config.json + weights) using the model file's mapping
    (``precision=`` and ``fuse=`` are build options, as for ``build``)."""
    from .checkpoint import from_hf as _from_hf
    return _from_hf(directory, model=model, target=target, **overrides)
