"""The source side: sources config, Postgres setup, Debezium connector config, decoding change events.

Knows nothing of embedding or serving.
"""
