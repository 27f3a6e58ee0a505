"""Llama-family models: architecture spec, the embedded default, resolution and loading.

Import the torch-heavy parts from their modules (`llmctl.models.loader`,
`llmctl.models.llama`); this package itself stays light for the CLI.
"""
