"""attnlab bench: sweep mechanisms x sequence lengths, store the results, analyse and plot them."""
