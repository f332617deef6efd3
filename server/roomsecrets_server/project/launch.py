"""What a manifest may put into a service process's environment.

A manifest's environment lands in a process the service runs (`roomsecrets run`, a deployer), so
a variable that a dynamic loader, an interpreter or a shell reads at start-up runs code of the
manifest author's choosing inside the service, next to every secret it was given; and `PATH`
chooses the very program that runs. These names are refused unless a project admin lists them in
the manifest's `container.allow_environment` (the one, explicit, admin-only way to set them).
`roomsecrets run` also never searches the command in the manifest's `PATH`.

Names compare case-insensitively; `document()` prints the list by what the variables control
(SECURITY.md has it).
"""

from __future__ import annotations

# name -> what it controls (exact names)
_EXACT: dict[str, str] = {
    # command search
    "PATH": "the command search path",
    "CDPATH": "the command search path",
    # shells: start-up files and evaluated settings
    **dict.fromkeys(
        (
            "BASH_ENV",
            "ENV",
            "SHELLOPTS",
            "BASHOPTS",
            "PS4",
            "PS1",
            "PROMPT_COMMAND",
            "IFS",
            "GLOBIGNORE",
            "ZDOTDIR",
            "BASH_XTRACEFD",
            "BASH_LOADABLES_PATH",
            "PS0",
            "FPATH",
            "INPUTRC",
            "HOME",
            "XDG_CONFIG_HOME",
        ),
        "shell and tool start-up files",
    ),
    # the dynamic loader and the C library
    **dict.fromkeys(
        (
            "GETCONF_DIR",
            "GLIBC_TUNABLES",
            "HOSTALIASES",
            "LOCALDOMAIN",
            "RES_OPTIONS",
            "NLSPATH",
        ),
        "the dynamic loader and C library",
    ),
    # interpreters and runtimes
    **dict.fromkeys(
        (
            "_JAVA_OPTIONS",
            "JDK_JAVA_OPTIONS",
            "CLASSPATH",
            "PHPRC",
            "PHP_INI_SCAN_DIR",
            "TCLLIBPATH",
            "R_PROFILE",
            "R_PROFILE_USER",
            "R_ENVIRON",
            "R_ENVIRON_USER",
            "COR_ENABLE_PROFILING",
            "COR_PROFILER",
            "COR_PROFILER_PATH",
            "MONO_ENV_OPTIONS",
            "MONO_PATH",
            "ELIXIR_ERL_OPTIONS",
            "R_LIBS",
            "R_LIBS_USER",
            "R_LIBS_SITE",
            "VIMINIT",
            "EXINIT",
            "MYVIMRC",
            "GEM_PATH",
            "GEM_HOME",
            "BUNDLE_GEMFILE",
            "MAVEN_OPTS",
            "GRADLE_OPTS",
            "SBT_OPTS",
            "ANT_OPTS",
            "GOFLAGS",
            "GOENV",
            "GOTOOLCHAIN",
            "GOPROXY",
            "GOROOT",
            "TCL_LIBRARY",
            "TK_LIBRARY",
        ),
        "interpreter start-up",
    ),
    # libraries' own configuration files and plug-in paths, which load code
    **dict.fromkeys(
        (
            "OPENSSL_CONF",
            "OPENSSL_MODULES",
            "OPENSSL_ENGINES",
            "GIO_EXTRA_MODULES",
            "GIO_MODULE_DIR",
            "GTK_MODULES",
            "GTK_PATH",
            "GTK_EXE_PREFIX",
            "QT_PLUGIN_PATH",
            "QT_QPA_PLATFORM_PLUGIN_PATH",
            "SASL_PATH",
            "KRB5_CONFIG",
            "KRB5CCNAME",
            "KRB5_KTNAME",
            "GNUPGHOME",
            "SSH_AUTH_SOCK",
            "PKCS11_MODULE_PATH",
            "XDG_CONFIG_DIRS",
            "XDG_DATA_DIRS",
            "LESSKEY",
            "WGETRC",
            "CURL_HOME",
            "NETRC",
            "GCONV_PATH",
        ),
        "library configuration and plug-ins",
    ),
    # programs other programs start
    **dict.fromkeys(
        (
            "SSH_ASKPASS",
            "SUDO_ASKPASS",
            "EDITOR",
            "VISUAL",
            "PAGER",
            "MANPAGER",
            "BROWSER",
            "LESSOPEN",
            "LESSCLOSE",
        ),
        "helper programs other programs start",
    ),
    # where traffic goes and whom TLS trusts
    **dict.fromkeys(
        (
            "HTTP_PROXY",
            "GRPC_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "FTP_PROXY",
            "NO_PROXY",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
            "SSLKEYLOGFILE",
        ),
        "network routing and TLS trust",
    ),
}
# name prefix -> what it controls
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("LD_", "the dynamic loader and C library"),
    ("DYLD_", "the dynamic loader and C library"),
    ("MALLOC_", "the dynamic loader and C library"),
    ("PYTHON", "interpreter start-up"),
    ("NODE_", "interpreter start-up"),
    ("NPM_CONFIG_", "interpreter start-up"),
    ("LUA_", "interpreter start-up"),
    ("PERL", "interpreter start-up"),
    ("RUBY", "interpreter start-up"),
    ("JAVA_", "interpreter start-up"),
    ("JULIA_", "interpreter start-up"),
    ("ERL_", "interpreter start-up"),
    ("BUN_", "interpreter start-up"),
    ("DENO_", "interpreter start-up"),
    ("DOTNET_", "interpreter start-up"),
    ("CORECLR_", "interpreter start-up"),
    ("COMPLUS_", "interpreter start-up"),
    ("GIT_", "helper programs other programs start"),
    ("BASH_FUNC_", "shell and tool start-up files"),
    ("GST_", "library configuration and plug-ins"),
    ("GDK_", "library configuration and plug-ins"),
    ("VK_", "library configuration and plug-ins"),
    ("__EGL_", "library configuration and plug-ins"),
    ("LIBGL_", "library configuration and plug-ins"),
    ("LIBVA_", "library configuration and plug-ins"),
    ("ROOMSECRETS_", "the roomsecrets client the service itself uses"),
)


def denied(name: str) -> str:
    """What `name` controls, if a manifest may not set it without an admin's allow-list; else ""."""
    upper = name.upper()
    found = _EXACT.get(upper)
    if found:
        return found
    for prefix, what in _PREFIXES:
        if upper.startswith(prefix):
            return what
    return ""


def refusal(name: str, what: str) -> str:
    return (
        f"{name} controls {what}: a manifest may set it only when a project admin lists it in "
        "container.allow_environment"
    )


def document() -> str:
    """The list as prose, for SECURITY.md and `--help`."""
    by_what: dict[str, list[str]] = {}
    for name, what in _EXACT.items():
        by_what.setdefault(what, []).append(name)
    for prefix, what in _PREFIXES:
        by_what.setdefault(what, []).append(prefix + "*")
    return "\n".join(f"- {what}: {', '.join(names)}" for what, names in by_what.items())
