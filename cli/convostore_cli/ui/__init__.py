"""`convostore ui`: a read-only session browser in a web page, served on 127.0.0.1."""
