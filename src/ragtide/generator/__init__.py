"""Answering: the OpenAI-compatible generator client, the prompt with citations, the local llama.cpp server."""
