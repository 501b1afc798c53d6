# Signet's CMake kit: `find_package(Signet REQUIRED)` makes signet_sign() available
# (SignetSign.cmake, beside this file). The signet-client package installs both in
# /usr/share/cmake/Signet, where find_package looks by itself.
include("${CMAKE_CURRENT_LIST_DIR}/SignetSign.cmake")
set(Signet_FOUND TRUE)
