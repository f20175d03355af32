"""The web dashboard (``leasesched dashboard``): a process beside the services that
shows the cluster through the gRPC API, with the logged-in person's token.
See docs/dashboard.md."""
