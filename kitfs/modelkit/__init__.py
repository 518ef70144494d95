"""The ModelKit format: Kitfile, manifest and config mapping, tar layers, tables of contents.

Pure and synchronous: nothing here touches the network.
"""
