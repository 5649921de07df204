"""spotinference: the gateway.

Subpackages in the order a request travels (docs/ARCHITECTURE.md walks it module by module):
accept -> parse -> admit -> limits -> routing -> upstream -> relay -> usage; observe, process and
commands around them. `gateway.Gateway` ties them together.
"""
