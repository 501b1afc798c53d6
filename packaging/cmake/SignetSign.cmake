# SignetSign.cmake: sign a target's output with the Signet appliance after it is built.
#
#   find_package(Signet REQUIRED)    # or include(/usr/share/cmake/Signet/SignetSign.cmake)
#   add_executable(app WIN32 main.c)
#   signet_sign(TARGET app
#               [PROFILE release]          # default: SIGNET_PROFILE, else signet's own
#               [DIGEST]                   # digest mode: only the Authenticode data travels
#               [DESCRIPTION "Example App"]
#               [URL https://example.com/]
#               [CA_FILE ca.pem])          # digest mode: verify against this CA
#
# Adds a POST_BUILD step to TARGET (an executable, shared library or module) that runs
# `signet sign` on its output file, in place, whenever the target is linked: a file that
# fails to sign fails the build (signet's exit code). signet finds the appliance as it
# always does (SIGNET_ENDPOINT, /etc/signet/signet.toml, else the Proxmox host over
# vsock).
#
# Cache variables:
#   SIGNET_EXECUTABLE  the signet program [default: found on PATH]
#   SIGNET_PROFILE     the profile when signet_sign() names none [default: signet's]
#   SIGNET_SIGN        OFF: signet_sign() adds nothing (a developer's build without the
#                      appliance) [default: ON]

include_guard(GLOBAL)

set(SIGNET_SIGN ON CACHE BOOL "Sign targets with Signet after they are built (signet_sign)")
set(SIGNET_PROFILE "" CACHE STRING "Signet profile for signet_sign() without PROFILE")

function(signet_sign)
  cmake_parse_arguments(PARSE_ARGV 0 arg
    "DIGEST" "TARGET;PROFILE;DESCRIPTION;URL;CA_FILE" "")
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR
      "signet_sign: unknown arguments ${arg_UNPARSED_ARGUMENTS}; it takes TARGET t "
      "[PROFILE p] [DIGEST] [DESCRIPTION d] [URL u] [CA_FILE pem]")
  endif()
  if(NOT arg_TARGET)
    message(FATAL_ERROR "signet_sign: name the target to sign: signet_sign(TARGET app)")
  endif()
  if(NOT TARGET ${arg_TARGET})
    message(FATAL_ERROR
      "signet_sign: ${arg_TARGET} is not a target; call signet_sign() after "
      "add_executable(${arg_TARGET} ...) or add_library(${arg_TARGET} SHARED ...)")
  endif()
  get_target_property(type ${arg_TARGET} TYPE)
  if(NOT type MATCHES "^(EXECUTABLE|SHARED_LIBRARY|MODULE_LIBRARY)$")
    message(FATAL_ERROR
      "signet_sign: ${arg_TARGET} is a ${type}; only executables, shared libraries and "
      "modules make a file Signet signs")
  endif()
  if(arg_CA_FILE AND NOT arg_DIGEST)
    message(FATAL_ERROR
      "signet_sign: CA_FILE verifies digest mode's signature: add DIGEST, or drop CA_FILE")
  endif()
  if(NOT SIGNET_SIGN)
    message(STATUS "Signet: not signing ${arg_TARGET} (SIGNET_SIGN is OFF)")
    return()
  endif()
  if(NOT SIGNET_EXECUTABLE)
    find_program(SIGNET_EXECUTABLE signet DOC "The signet client (package signet-client)")
  endif()
  if(NOT SIGNET_EXECUTABLE)
    message(FATAL_ERROR
      "signet_sign: the signet program is not on PATH: install the signet-client package, "
      "pass -DSIGNET_EXECUTABLE=/path/to/signet, or -DSIGNET_SIGN=OFF to build unsigned")
  endif()

  set(args sign)
  if(NOT "${arg_PROFILE}" STREQUAL "")
    list(APPEND args --profile "${arg_PROFILE}")
  elseif(NOT "${SIGNET_PROFILE}" STREQUAL "")
    list(APPEND args --profile "${SIGNET_PROFILE}")
  endif()
  if(arg_DIGEST)
    list(APPEND args --digest)
  endif()
  if(arg_CA_FILE)
    get_filename_component(ca "${arg_CA_FILE}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
    list(APPEND args --ca-file "${ca}")
  endif()
  if(DEFINED arg_DESCRIPTION)
    list(APPEND args --description "${arg_DESCRIPTION}")
  endif()
  if(DEFINED arg_URL)
    list(APPEND args --url "${arg_URL}")
  endif()
  add_custom_command(TARGET ${arg_TARGET} POST_BUILD
    COMMAND "${SIGNET_EXECUTABLE}" ${args} "$<TARGET_FILE:${arg_TARGET}>"
    COMMENT "Signing ${arg_TARGET} with Signet"
    VERBATIM)
endfunction()
