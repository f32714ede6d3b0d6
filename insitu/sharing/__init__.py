"""Sharing adapter packages between sites: Ed25519 signatures (`signing`) and a folder registry (`registry`).

Neither module imports torch: signing, verifying, publishing and pulling need only the package's
bytes, its JSON and its safetensors header.
"""
