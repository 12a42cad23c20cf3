"""The Hydra config tree, installed as the package safetransfer.conf (found as pkg://safetransfer.conf)."""

from safetransfer.job.schema import register

register()  # the schema conf/config.yaml builds on, before Hydra reads the tree
