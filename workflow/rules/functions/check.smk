# Input functions of the check stage's rules (check.smk).

from functools import lru_cache

from mergeflow.check import weights_fingerprint
from mergeflow.gguf import gguf_file
from mergeflow.locations import gguf_model_dir, model_check_file, zoo_model_dirs

# Model directories the zoo builds (outputs of its jobs: Snakemake tracks them).
ZOO_DIRS = {str(p) for p in zoo_model_dirs(config).values()}
# Hub models by the name of the directory the fetch stage writes them to.
HUB_MODELS = {hub_model_dir(spec).name: spec for spec in config["models"].values() if "hub" in spec}
# GGUF models by the name of the directory convert_gguf writes: (model name, the GGUF file).
GGUF_MODELS = {gguf_model_dir(spec).name: (name, gguf_file(name, spec))
               for name, spec in config["models"].items() if "gguf" in spec}


@lru_cache(maxsize=None)
def external_fingerprint(name):
    """The weights fingerprint of a model directory the workflow does not write (a local
    ``path`` outside the zoo), read once per invocation; None for zoo and hub models, whose
    directories are outputs of their own jobs. A directory the check cannot fingerprint is
    left to the check job to name."""
    spec = config["models"][name]
    if "path" not in spec or str(local_model_dir(spec)) in ZOO_DIRS:
        return None
    try:
        return weights_fingerprint(name, local_model_dir(spec))
    except (MergeflowError, OSError):
        return None


@lru_cache(maxsize=None)
def check_inputs(name):
    """What a model's check depends on: its and the base's config entries (key order aside), the
    fingerprints of their weights where the workflow does not write them and tokenizer_source. It names the
    check's report (model_check), so a changed model is checked into a new file. Computed once
    per invocation: every job that reads a model asks for its check."""
    names = (name, config["base_model"])
    inputs = {"models": canonical({n: config["models"][n] for n in names}),
              "fingerprints": {n: external_fingerprint(n) for n in names}}
    if config.get("tokenizer_source"):  # vocabularies may differ (absent: the digests of before)
        inputs["tokenizer_source"] = config["tokenizer_source"]
    return inputs

