"""Login-protected web page of the node: study list, study pages, overlay pictures, health."""
