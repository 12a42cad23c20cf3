"""The Hydra config tree, installed as the package safetransfer.conf (found as pkg://safetransfer.conf)."""
