"""Deployment: container entrypoint, image build scripts, locust load test (`make load`)."""
