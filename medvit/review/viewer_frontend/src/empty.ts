// The Node built-in `url` that vtk.js XML I/O names (through xmlbuilder2) but the viewer never calls.
export default {};
