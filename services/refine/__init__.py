"""LVLM caption refinement: the client, the VLM-150M schema, the prompt and the offline job."""
