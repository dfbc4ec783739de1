# On pip-only machines (ROS 2 from PyPI wheels) the message wheels' exported
# *__rosidl_generator_py targets carry include directories of the wheel build container
# (/opt/python/...). Re-point them at this interpreter's Python and numpy headers.
# On a normal ROS 2 install no such path exists and this is a no-op.
function(perception2d_fix_pip_python_targets)
  find_package(Python3 REQUIRED COMPONENTS Interpreter Development NumPy)
  foreach(pkg ${ARGN})
    set(tgt "${pkg}::${pkg}__rosidl_generator_py")
    if(TARGET ${tgt})
      get_target_property(dirs ${tgt} INTERFACE_INCLUDE_DIRECTORIES)
      if(dirs AND "${dirs}" MATCHES "/opt/python/")
        set_target_properties(${tgt} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES
          "${Python3_INCLUDE_DIRS};${Python3_NumPy_INCLUDE_DIRS}")
      endif()
    endif()
  endforeach()
endfunction()
