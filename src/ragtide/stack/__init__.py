"""The native stack on localhost (no Docker): Postgres, Kafka (KRaft), Kafka Connect + Debezium, the node.

`ragtide up` and the e2e test fixtures use exactly this code: each process gets a pid file and a log under
the data folder, and is stopped by pid.
"""
