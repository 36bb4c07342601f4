// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'health',
  title: 'Health',
  group: 'Operations',
  render(ctx, el) {
    mount(el, header('Health'), h('p', {}, 'Not built yet.'));
  },
};
