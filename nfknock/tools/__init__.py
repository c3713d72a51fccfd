"""What an administrator runs beside the daemon: doctor, the knock client, the status view, the
knockd and fwknop importers, key files and the man page. Tools may read the daemon's and the
firewall's modules; nothing in daemon/, firewall/ or doors/ imports a tool."""
