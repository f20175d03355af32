"""The gRPC server kit every leasesched process is built with.

Server set-up with health, reflection, TLS and keepalive (``grpc_server``),
connecting to ZooKeeper and the store at start (``bootstrap``), the
interceptors (authentication, error mapping, metrics) and the request checks
(``validation``). TaskService and TaskUpdater (``services/``) and the
trigger (``trigger/``) use it; it imports none of them.
"""
