"""The structured space, its FAISS index, the cascade engine and its evaluation. Runs without a server."""
