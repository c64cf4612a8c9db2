"""Test harness shared by every tier: real RabbitMQ vhosts, real processes, cleanup."""
